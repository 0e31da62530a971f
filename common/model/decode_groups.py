"""Which sequences of a decode batch share one padded attention gather.

Decode attention gathers each sequence's KV blocks into a (sequences, max_blocks) padded tensor, so one
long context in a batch of short ones makes every short one gather and attend over the long one's length.
Splitting the batch into groups of similar length removes that padding, but every group costs a fixed
number of extra operations per layer. `plan_groups` picks the split of the length-sorted sequences that
minimises the total: sum over groups of (GROUP_OVERHEAD_BLOCKS + sequences x longest table). Pure Python.
"""

# A group's fixed cost per layer (a dozen small torch calls, about 0.1 ms here), in the units of the padded
# gather (blocks of 16 tokens: one block costs ~5 us to gather and attend over per layer on this CPU).
GROUP_OVERHEAD_BLOCKS = 24


def plan_groups(num_blocks: list[int], overhead_blocks: int = GROUP_OVERHEAD_BLOCKS) -> list[list[int]]:
    """Indices into num_blocks (each sequence's block-table length), grouped; groups are runs of the
    length-sorted order, so each group pads to its own longest table. One group when splitting does not pay."""
    order = sorted(range(len(num_blocks)), key=lambda i: num_blocks[i])
    lengths = [num_blocks[i] for i in order]
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: least cost of grouping the first j sorted sequences
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = lengths[end - 1]
        for start in range(end):
            cost = best[start] + overhead_blocks + (end - start) * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]
