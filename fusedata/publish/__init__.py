"""`fusedata publish`: a finished dataset folder on the Hugging Face Hub (hub.py), with a generated
dataset card (card.py)."""

from fusedata.publish.card import dataset_card, reproduce_commands
from fusedata.publish.hub import (
           BYTES_PER_COMMIT,
           FILES_PER_COMMIT,
           PublishPlan,
           PublishResult,
           plan_publish,
           publish,
)

__all__ = ["BYTES_PER_COMMIT", "FILES_PER_COMMIT", "PublishPlan", "PublishResult", "dataset_card", "plan_publish",
           "publish", "reproduce_commands"]
