"""The model a config describes: the ranking model, or a two-tower graph model (`model.graph.model`)."""

from __future__ import annotations

from torch import nn

from common.errors import MMRankError
from trainer.model.config import ModelConfig
from trainer.model.em3_freedom import EM3Freedom
from trainer.model.freedom import Freedom
from trainer.model.lightgcn import LightGCN
from trainer.model.ranking_model import ModelSchema, RankingModel

GRAPH_MODELS = {"lightgcn": LightGCN, "freedom": Freedom, "em3_freedom": EM3Freedom}


def is_graph_model(cfg: ModelConfig) -> bool:
    return cfg.graph.model != "none"


def build_model(cfg: ModelConfig, schema: ModelSchema) -> nn.Module:
    """RankingModel for graph.model = none, else the graph model it names."""
    if not is_graph_model(cfg):
        return RankingModel(cfg, schema)
    if cfg.graph.model not in GRAPH_MODELS:
        raise MMRankError(
            f"model.graph.model={cfg.graph.model!r}; expected none or one of {', '.join(GRAPH_MODELS)}"
        )
    return GRAPH_MODELS[cfg.graph.model](cfg, schema)
