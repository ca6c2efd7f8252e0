"""Pure tensor maths of blocked Kronecker preconditioners (no Keras here).

- `layout`: how variables are merged and blocked, and their factors;
- `kronecker`: statistics and the one contraction both optimizers use;
- `parts`: elementwise state (moments, grafting) per block shape;
- `shampoo`: grafting, preconditioning and momentum;
- `soap`: eigenbases, projections and the Adam step in the basis.
"""
