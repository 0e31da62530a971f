"""The committed wire code in pdserve/v1 is exactly what `make protos` generates from protos/."""

from pdserve.protogen.generate import REPO_ROOT, generate


def test_generated_code_is_fresh(tmp_path):
    fresh = {p.name: p.read_bytes() for p in generate(tmp_path)}
    committed_dir = REPO_ROOT / "pdserve" / "v1"
    committed = {p.name: p.read_bytes() for p in committed_dir.iterdir() if p.name in fresh or "_pb2" in p.name}
    stale = sorted(name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name))
    assert not stale, f"pdserve/v1 is stale for {stale}: run `make protos` and commit the result"


def test_every_proto_field_has_a_doc_comment():
    import re

    undocumented = []
    for proto in sorted((REPO_ROOT / "protos").rglob("*.proto")):
        lines = proto.read_text().splitlines()
        for index, line in enumerate(lines):
            is_field = re.match(r"\s+(optional |repeated )?[\w.]+ \w+ = \d+;", line)
            if is_field and not lines[index - 1].strip().startswith("//"):
                undocumented.append(f"{proto.name}:{index + 1}: {line.strip()}")
    assert not undocumented, "fields without a doc comment:\n" + "\n".join(undocumented)
