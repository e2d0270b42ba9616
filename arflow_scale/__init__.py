"""arflow_scale: train ARFlow image generators at scale."""
__version__ = "0.1.0"
