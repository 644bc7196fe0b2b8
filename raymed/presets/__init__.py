"""The YAML config presets (package data), read by raymed.config."""
