"""The public ops, one module each (or one per op family): the declaration (``_define``),
the argument checks and the documented function. ``m2f_kernels`` exports them."""
