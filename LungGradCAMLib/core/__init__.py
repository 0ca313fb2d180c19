"""The types everything else uses (Volume, LabelMap, results, errors) and the rules of files and memory
(paths, limits, atomic writes). Imports no torch."""
