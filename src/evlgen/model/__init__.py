"""Model parts: pure merging functions, connectors, frozen towers, and their composition."""
