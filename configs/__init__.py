"""medfm.configs: the YAML recipes, shipped as package data (``medfm recipes list|show``)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
