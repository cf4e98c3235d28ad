"""stvr: spatio-temporal video re-localization by warp LSTM (CVPR 2019) in PyTorch."""

__version__ = "0.1.0"
