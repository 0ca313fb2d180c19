"""The CAM engine: CAM methods, the sliding window, the lung mask, preprocessing, networks, model cards
and loading, the device policy and the torchrun helper. Works on arrays and Volumes; reads no files
of the user's, knows no CLI, training or Slicer."""
