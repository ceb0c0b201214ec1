"""The benchmark app and the training demo, kept apart from the loss library.

- ``cli``: the ``blobbench`` command (``blobbench``, ``python -m blobbench``, ``blobbench train``);
- ``bench``: the engine (cases, implementations, measurements in fresh processes);
- ``report``: tables, ratios and plots of a run;
- ``synthetic``: the paper-shaped dataset profiles and synthetic instance volumes;
- ``labelfiles``: loading and cropping the user's label files;
- ``train``: the training demo (dice vs blob dice on synthetic data).

Nothing here is imported by ``import blobbench``; these modules need the ``[bench]`` extra.
"""
