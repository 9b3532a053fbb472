"""Model-card templates (Jinja, rendered by hf_ext.hub.render_card), shipped as package data."""
