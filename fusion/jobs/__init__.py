"""Jobs: what a script runs, as functions a notebook or a test can call too (sampling from a
model folder, editing with one). They sit above every library layer (docs/design.md, "Layers")."""
