"""The CTR accuracy experiment: data loaders (:mod:`.data`), models and their training loop
(:mod:`.models`), the experiment runner (:mod:`.runner`) and the ``qembed`` command line
(:mod:`.cli`).

Not part of the library: ``import qembed`` does not load it. It needs the ``experiments``
extra (``pip install 'qembed[experiments]'``: tqdm, matplotlib).
"""
