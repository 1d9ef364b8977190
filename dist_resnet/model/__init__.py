"""Models and their weights, in four parts:

- reference.py: the reference notebook's residual network, the default model;
- families.py: the families `--model NAME` chooses from (the reference, torchvision's, timm's,
  the user's own): adding a family is one entry there;
- layers.py: what the suite does to any model's layers (SyncBatchNorm, recalibration);
- weights.py: weights files and their cards, read as untrusted input; --init-from.

The names other modules use are here, so that they import `dist_resnet.model` alone.
"""

from dist_resnet.model.families import FAMILIES, ModelError, Shape, build, imports_code
from dist_resnet.model.layers import (convert_sync_bn, count_parameters, has_batchnorm, io_shape,
                                      recalibrate_batchnorm, should_sync_bn)
from dist_resnet.model.reference import NUM_CLASSES, REFERENCE_WIDTHS, ResBlock, ResNet, widths_from_shapes
from dist_resnet.model.weights import (CARD_KEY, MAX_CARD_BYTES, MAX_CLASSES, MAX_WEIGHTS_BYTES, NOTEBOOK_PARTS,
                                       WeightsError, from_notebook_names, load_model, model_name, open_weights,
                                       read_card, start_from, to_notebook_names, weights_path)

__all__ = ["CARD_KEY", "FAMILIES", "MAX_CARD_BYTES", "MAX_CLASSES", "MAX_WEIGHTS_BYTES", "NOTEBOOK_PARTS",
           "NUM_CLASSES", "REFERENCE_WIDTHS", "ModelError", "ResBlock", "ResNet", "Shape", "WeightsError", "build",
           "convert_sync_bn", "count_parameters", "from_notebook_names", "has_batchnorm", "imports_code", "io_shape",
           "load_model", "model_name", "open_weights", "read_card", "recalibrate_batchnorm", "should_sync_bn",
           "start_from", "to_notebook_names", "weights_path", "widths_from_shapes"]
