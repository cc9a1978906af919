"""fusion: early-fusion text-and-image generative models (Transfusion, Chameleon).

``from fusion import FusionPipeline`` (fusion.api) loads a trained model folder for use from
Python; it is imported on first use, so ``import fusion`` stays light."""


def __getattr__(name: str):
    if name == "FusionPipeline":
        from fusion.api import FusionPipeline

        return FusionPipeline
    raise AttributeError(f"module 'fusion' has no attribute {name!r}")
