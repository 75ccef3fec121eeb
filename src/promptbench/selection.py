"""Model-selection policy: which data a method may choose its hyper-parameters or its epoch on.

Few-shot papers differ here more than anywhere else, and the choice moves numbers by points: Tip-Adapter's
official code searches alpha/beta on the whole val split (its dataset code makes only the train split
few-shot) and picks Tip-Adapter-F's epoch on the test split; CoOp's linear probe searches C on a K-shot val
split; a few-shot user has neither a full val split nor, certainly, the test labels. promptbench makes the
policy one explicit option, `selection=<policy>`, recorded in every results.json and shown by the report:

- `fewshot_val` (the default): the K-shot val split, min(K, 4) images per class, drawn right after the train
  shots (protocol.md section 2);
- `none`: no selection data at all; every method keeps its fixed published defaults;
- `full_val`: the dataset's whole val split, in the training classes (Tip-Adapter's `main.py` search);
- `test_parity`: the test images of the training classes, to reproduce a paper that selects on test
  (Tip-Adapter-F's best epoch). Such numbers are optimistic: results.json and the report mark them.

A method that selects something names it in `Method.selects`; it reads the policy's images as the set
`SELECTION_SET` through its data contract, and the protocol's `Task` supplies them under that name.
"""

from __future__ import annotations

from promptbench.errors import PromptbenchError

POLICIES = ("fewshot_val", "none", "full_val", "test_parity")
# The policy of a method built outside a composed config; conf/config.yaml sets the same (a test checks it).
DEFAULT_POLICY = "fewshot_val"
SELECTION_SET = "selection"
# The policies whose selection set is not meant to share images with the eval sets.
CLEAN_POLICIES = ("fewshot_val", "full_val")
TEST_PARITY_WARNING = ("selection=test_parity: this run chose its {what} on the test split, as the paper's code does; "
                       "its numbers are optimistic and not a clean few-shot result")


def check_policy(policy: object) -> str:
    if policy not in POLICIES:
        raise PromptbenchError(f"selection={policy!r}: expected one of {', '.join(POLICIES)} (fewshot_val: the K-shot val "
                               f"split; none: fixed defaults, no selection data; full_val: the whole val split; "
                               f"test_parity: the test split, as some papers do)")
    return str(policy)
