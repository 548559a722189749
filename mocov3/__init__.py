"""mocov3: MoCo v3 self-supervised pretraining of Vision Transformers (Chen, Xie, He, ICCV 2021)."""
__version__ = "0.1.0"
