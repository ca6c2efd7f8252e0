"""Pure tensor maths of blocked Kronecker preconditioners (no Keras here).

- `layout`: how variables are merged and blocked, and their factors;
- `kronecker`: statistics and the one contraction both optimizers use;
- `shampoo`: grafting, preconditioning and momentum for one variable;
- `soap`: eigenbases, projections and the Adam step in the basis.
"""
