"""The tools beside the models: Hub loading and export, deployment exports, FLOP counts, paper reports, attention maps.

They live apart from the core (the model, its layers, the TME and the checkpoint filter) so that `timm.create_model`
imports none of them; their heavier dependencies, fvcore and matplotlib, come with the `[tools]` extra.
"""
