"""Images: references, sources (registries, archives), the content store and pulls."""
