"""The embedded toy world: procedural block scenes, tasks and solutions, a batched renderer, an exact
latent map (the toy "VAE"), a local tokenizer + text encoder, and the oracle judge and proposer.

See docs/TOYWORLD.md for the design and why the Demonstrator has a solution-vs-task gap.
"""
