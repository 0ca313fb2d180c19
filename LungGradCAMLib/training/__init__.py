"""Training: data sources and patch sets, fit (single process or DDP), augmentation, and the heat-map
retraining test. Library functions take typed specs (DataSpec, TrainConfig, ModelCard)."""
