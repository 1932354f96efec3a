"""fastai callbacks of the toolkit's training recipe (imported lazily: fastai is heavy)."""

from __future__ import annotations

from fastai.callback.core import Callback, TrainEvalCallback
from fastai.callback.training import set_bn_eval
from torch import nn

from toolkit.core.backbones import has_fastai_head


class PretrainedBatchNormStats(Callback):
    """Keep the pretrained body's batch-norm statistics (ImageNet's) in every phase; once unfrozen
    their affine weights still learn. fastai's BnFreeze stops doing this when the body is
    unfrozen, and batch statistics of 32 images then knock the pretrained features off (measured
    on clothing-small at 288 px: 88.3% after the frozen phase -> 77.7% after one unfrozen epoch).
    The head's batch norms train as usual. `keep=False` (settings `body_bn = adapt`), or a model
    that is not body + fastai head: BnFreeze's rule (batch norms of frozen layers in eval mode).
    Data far from ImageNet needs that: 28-px greyscale Fashion-MNIST at lr 5e-3 diverged (11%)
    with the statistics kept."""

    run_after = TrainEvalCallback

    def __init__(self, keep: bool = True):
        self.keep = keep

    def before_train(self) -> None:
        model = self.learn.model
        if not (self.keep and has_fastai_head(model)):
            set_bn_eval(model)
            return
        for layer in model[0].modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.eval()
