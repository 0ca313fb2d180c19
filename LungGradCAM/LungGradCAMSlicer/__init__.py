"""The Slicer module's own code beyond LungGradCAM.py: its settings and logic (logic.py) and the
engine's background run (background.py). A sub-folder because Slicer loads every .py file beside
LungGradCAM.py as a module of its own; LungGradCAM.py puts the engine (LungGradCAMLib) on the path
before it imports this package."""
