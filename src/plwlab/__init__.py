"""plwlab: prompt loss weight (PLW) studies for instruction fine-tuning."""

__version__ = "0.1.0"
