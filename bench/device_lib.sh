# Helpers for device call scripts (source it; each stop's bench/results/*/call*.sh as run keeps
# its own copy as a record). Needs python3, which the device machine has.

# One line per `ferry bench --json` file: step, copy lane, copy rate, GB a pass, bound, step/bound.
summary() { python3 - "$@" <<'PY'
import json,sys,os
for f in sys.argv[1:]:
    try:
        r=json.load(open(f))['results'][0]; s=r['streamed']
        print('%-22s step %.4f copy %.4f gbps %.2f gb %.3f bound %.4f ratio %.3f'%(os.path.basename(f),r['step_s'],s['copy_s'],s['achieved_gbps'],s['streamed_gb'],s['bound_s'],r['step_s']/s['bound_s']), flush=True)
    except Exception as e: print(f, 'error', e, flush=True)
PY
}

# The DiT blocks' copy spans of a `--timeline` SVG: min / median / max ms, and GB/s at $2 MB a
# piece (default 242.4, the Z-Image DiT's coded block).
block_copies() { python3 - "$1" "${2:-242.4}" <<'PY'
import re,sys
t=re.findall(r'<title>([^<]*)</title>', open(sys.argv[1]).read()); mb=float(sys.argv[2])
c=sorted(float(m.group(1)) for x in t for m in [re.match(r'block \d+: copy .*\(([0-9.]+) ms\)',x)] if m)
if not c: sys.exit('%s: no block copies drawn' % sys.argv[1])
print('%s block copies: n %d min %.3f median %.3f max %.3f ms -> %.1f / %.1f / %.1f GB/s at %.1f MB'%(sys.argv[1].split('/')[-1],len(c),c[0],c[len(c)//2],c[-1],mb/c[0],mb/c[len(c)//2],mb/c[-1],mb))
PY
}

# The GPU test binaries find tests/fixtures under the path they were built in (.gpu/built_in):
# point that path at this checkout when it differs.
link_fixtures() {
    local b; b=$(cat .gpu/built_in)
    [ -d "$b/tests/fixtures" ] || { mkdir -p "$(dirname "$b")"; ln -sfn "$PWD" "$b"; }
}
