"""Patches that put m2f_kernels into third-party Mask2Former implementations.

- :mod:`m2f_kernels.integrations.transformers`: Hugging Face transformers'
  ``Mask2FormerForUniversalSegmentation`` (``apply_m2f_kernels_to_mask2former``) and
  ``EomtForUniversalSegmentation``'s loss (``apply_m2f_kernels_to_eomt``).

Each submodule imports its third-party package only when imported itself.
"""
