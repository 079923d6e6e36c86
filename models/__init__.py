"""What is trained: model builders. Imports neither Ray nor raysim."""
