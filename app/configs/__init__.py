"""Model config files (LLMConfig layout) shipped with the kit; parsed by `app.models.config`."""
