"""The baseline: MetaSchedule's evolutionary search ranked by its XGBoost cost model (Ansor's successor)."""
from tvm.s_tir import meta_schedule as ms


def make_ansor(**_):
    # MetaSchedule's defaults (population 512, 4 evolution rounds, eps-greedy 0.05) are the baseline as shipped.
    return lambda task: ms.search_strategy.EvolutionarySearch()
