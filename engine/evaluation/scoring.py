"""Score matrices: the method layer's one implementation of the scoring rule (engine.scoring), re-exported."""
from engine.aggregate import MISSING, aggregate_masked  # noqa: F401
from engine.scoring import (DISTANCES, Variant, adaptive_score_matrix, dataset_score_matrix,  # noqa: F401
                            neighbour_score_matrix, padded_references, score_matrix, similarity)
