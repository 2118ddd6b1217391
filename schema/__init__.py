"""medfm.schema: typed configs. Every part declares its own dataclass config; this module turns YAML/dicts
and dotted ``key=value`` overrides into those dataclasses and back, with one-line errors that name the field."""

from medfm.schema.typed import ConfigError, apply_overrides, from_dict, load_yaml, read_yaml_mapping, to_dict

__all__ = ["ConfigError", "apply_overrides", "from_dict", "load_yaml", "read_yaml_mapping", "to_dict"]
