"""One module per offline objective.

Each gives ``normalizers(batch)`` and ``make_loss_fn(...)`` returning ``loss_fn(model, batch, norms, key)``
for :func:`jrft.train.step.make_train_step` (see that module for the contract).
"""
