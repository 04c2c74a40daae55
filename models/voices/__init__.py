"""Voice knowledge: how a family of speech LMs turns text into a prompt, which tokens it may
generate (its rule), how its tokens become codec frames, and its sampling defaults. The engine
decodes every family the same way; a family brings these, never a decode loop."""
