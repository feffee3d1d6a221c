"""Layer-importance methods, registered by name. Each is `method(loaded, tokens, settings) -> LayerScores`."""
