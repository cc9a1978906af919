"""Converters from other projects' checkpoints into fusion's own formats (docs/pretrained.md).

* :mod:`fusion.convert.llama`: a Hugging Face Llama-family folder as the shared backbone of
  either family (``init_backbone=``);
* :mod:`fusion.convert.chameleon`: a Hugging Face Chameleon / Anole folder into a Chameleon
  family model folder;
* :mod:`fusion.convert.taming`: a taming-transformers VQ-GAN (Chameleon's original release)
  into fusion's VQ-GAN tokenizer.

Everything reads local files only; nothing is downloaded.
"""
