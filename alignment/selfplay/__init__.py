"""Self-play preference optimisation (SPPO, GPO): generate, score with a preference model, train, repeat.

- ``generate_responses`` / ``SamplingOptions``: ``K`` samples per prompt from the current policy;
- preference models: ``PairRanker`` (PairRM-style pair encoder), ``GeneralPreferenceModel`` (GPM, skew-symmetric
  operator) and ``CallablePreference`` (any ``score(prompt, responses) -> (K, K)`` of ``P(i≻j)``);
- ``win_rates`` / ``preference_scores`` / ``preference_rows``: SPPO's and GPO's estimates and training pairs;
- ``run_self_play`` / ``SelfPlayConfig``: the resumable iteration protocol with its report.
"""

from prefuse.alignment.selfplay.estimates import preference_rows, preference_scores, select_pair, win_rates
from prefuse.alignment.selfplay.generation import SamplingOptions, generate_responses
from prefuse.alignment.selfplay.gpm import GeneralPreferenceModel, skew_operator
from prefuse.alignment.selfplay.loop import SelfPlayConfig, SelfPlayResult, round_prompts, run_self_play
from prefuse.alignment.selfplay.preference import CallablePreference, PreferenceModel
from prefuse.alignment.selfplay.ranker import PairRanker

__all__ = [
    "CallablePreference",
    "GeneralPreferenceModel",
    "PairRanker",
    "PreferenceModel",
    "SamplingOptions",
    "SelfPlayConfig",
    "SelfPlayResult",
    "generate_responses",
    "preference_rows",
    "preference_scores",
    "round_prompts",
    "run_self_play",
    "select_pair",
    "skew_operator",
    "win_rates",
]
