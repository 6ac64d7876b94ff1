#!/usr/bin/env python3
"""Import circles between the modules of a Rust source tree (issue 30).

    scripts/import-circles.py actors/src
    scripts/import-circles.py src

Reads `use crate::…`, `use super::…` and `crate::…` paths per file (doc and
line comments and `#[cfg(test)] mod tests` left out), resolves each to the
longest module path that exists, and prints every strongly connected
component of more than one module with its edges. No output: no circle.
A child using its parent is not counted (a folder and its rooms).
"""
import os,re,sys,collections
root=sys.argv[1]
mods={}
for dp,dn,fn in os.walk(root):
    for f in fn:
        if not f.endswith('.rs'): continue
        p=os.path.join(dp,f); rel=os.path.relpath(p,root)[:-3]
        parts=rel.split('/')
        if parts[-1] in('mod','lib','main'): parts=parts[:-1]
        mods['::'.join(parts)]=p
def resolve(cur, path):
    # cur: module path list; path: list of segments after use
    segs=path
    if segs[0]=='crate': base=[]; segs=segs[1:]
    elif segs[0]=='super':
        base=cur[:]
        while segs and segs[0]=='super': base=base[:-1]; segs=segs[1:]
    elif segs[0]=='self': base=cur[:]; segs=segs[1:]
    else: return None
    # longest prefix that is a module
    best=None
    for i in range(len(segs),-1,-1):
        m='::'.join(base+segs[:i])
        if m in mods: best=m;break
    return best
edges=collections.defaultdict(set)
for m,p in mods.items():
    cur=m.split('::') if m else []
    src=open(p).read()
    # strip test modules roughly
    src=re.split(r'#\[cfg\(test\)\]\s*mod tests',src)[0]
    src="\n".join(l for l in src.split("\n") if not l.strip().startswith("//"))
    for u in re.finditer(r'\buse\s+((?:crate|super|self)(?:::[A-Za-z_0-9]+)*)(?:::\{([^;]*)\})?',src):
        segs=u.group(1).split('::')
        targets=[]
        if u.group(2):
            for item in re.split(r',',u.group(2)):
                item=item.strip().split(' as ')[0]
                if not item: continue
                targets.append(segs+[s for s in re.split(r'::',item.replace('{','').replace('}','')) if s and s!='self'])
        else: targets.append(segs)
        for t in targets:
            r=resolve(cur,t)
            if r is not None and r!=m and not m.startswith(r+'::') and r!='':
                edges[m].add(r)
    for u in re.finditer(r'\b((?:crate|super)(?:::[A-Za-z_0-9]+)+)',src):
        r=resolve(cur,u.group(1).split('::'))
        if r is not None and r!=m and not m.startswith(r+'::') and r!='':
            edges[m].add(r)
# Tarjan SCC
idx={};low={};st=[];on=set();res=[];c=[0]
sys.setrecursionlimit(10000)
def sc(v):
    idx[v]=low[v]=c[0];c[0]+=1;st.append(v);on.add(v)
    for w in edges.get(v,()):
        if w not in idx: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        if len(comp)>1: res.append(comp)
for v in list(mods):
    if v not in idx: sc(v)
for comp in res:
    print("CYCLE:",sorted(comp))
    for a in comp:
        for b in edges[a]:
            if b in comp: print("   ",a,"->",b)
