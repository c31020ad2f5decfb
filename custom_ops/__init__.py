"""Every non-standard node lowbit emits: schema, packing, numpy reference kernel, fallback."""
