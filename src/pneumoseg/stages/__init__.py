"""Pipeline stages: each turns the outputs of earlier stages into its own, recorded in a stage folder
(:mod:`pneumoseg.layout` names the folders and the files that later stages read).

Numbered scripts in ``scripts/`` are thin wrappers over the ``run`` function of these modules.
"""
