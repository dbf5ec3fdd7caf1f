"""Print profile_step.py's JSON lines as a table: per setting, the faster of the repeated rounds."""
import json
import sys

rows = {}
for line in open(sys.argv[1] if len(sys.argv) > 1 else "runs/explore/profile.jsonl"):
    r = json.loads(line)
    key = (r["setting"], r["threads"])
    if key not in rows or r["s_per_step"] < rows[key]["s_per_step"]:
        rows[key] = r
print("| setting | threads | batch | s/step | samples/s | load | VM fwd+bwd | mSRU fwd+bwd | UM fwd+bwd | fusion fwd+bwd | data | optimizer |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for (name, th), r in rows.items():
    ms = r["ms"]
    f = lambda k: f"{ms.get(k + '.fwd', 0):.0f}+{ms.get(k + '.bwd', 0):.0f}"  # noqa: E731
    print(f"| {name} | {th} | {r['batch']} | {r['s_per_step']:.3f} | {r['samples_per_s']:.1f} | {r['load']} | {f('visual')} | "
          f"{f('msru')} | {f('upsampling')} | {f('fusion+gather')} | {ms['data']:.0f} | {ms['optimizer']:.0f} |")
