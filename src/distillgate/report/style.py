"""The report's stylesheet, kept in Python so it ships inside the package with no package-data rule."""

CSS = """
:root { --fg:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f5f7fa; --card:#fff; --accent:#3b6fd8;
  --ok:#2f9e44; --ok-bg:#e6f6ea; --bad:#c92a2a; --bad-bg:#fdecec; --warn:#e67700; --warn-bg:#fff4e0;
  --run:#1c7ed6; --run-bg:#e7f1fc; --idle:#868e96; --idle-bg:#f1f3f5; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.5 Inter,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif; color:var(--fg);
  background:var(--bg); }
.wrap { max-width:1280px; margin:0 auto; padding:0 24px; }
header { background:#102a43; color:#f0f4f8; padding:20px 0 0; }
header h1 { font-size:22px; margin:0; font-weight:600; }
header code { background:#243b53; color:#fff; padding:1px 8px; border-radius:4px; }
.title { display:flex; align-items:center; gap:12px; }
.meta { display:flex; flex-wrap:wrap; gap:8px 24px; margin:10px 0 4px; color:#bcccdc; }
.meta b { color:#829ab1; font-weight:500; margin-right:4px; }
.summary { margin:8px 0 0; max-width:900px; color:#d9e2ec; }
nav { display:flex; gap:4px; margin-top:14px; overflow-x:auto; }
nav a { color:#bcccdc; text-decoration:none; padding:8px 12px; border-bottom:2px solid transparent; }
nav a:hover { color:#fff; border-color:#62b0e8; }
main section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:16px 20px;
  margin:20px 0; }
h2 { font-size:17px; margin:0 0 12px; font-weight:600; }
h3 { font-size:14px; margin:14px 0 6px; font-weight:600; }
.muted { color:var(--muted); }
code { font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(170px,1fr)); gap:12px; }
.card, .dim { border:1px solid var(--line); border-radius:6px; padding:10px 14px; background:#fbfcfd; }
.card span, .dim span { display:block; color:var(--muted); font-size:12px; text-transform:uppercase;
  letter-spacing:.04em; }
.card b { font-size:20px; font-weight:600; }
.dims { display:grid; grid-template-columns:repeat(4,1fr); gap:12px; margin:12px 0; }
.dim b { font-size:18px; color:var(--accent); }
.grid2 { display:grid; grid-template-columns:repeat(auto-fit,minmax(440px,1fr)); gap:16px; }
.grid3 { display:grid; grid-template-columns:repeat(auto-fit,minmax(360px,1fr)); gap:16px; }
.scroll { overflow-x:auto; }
.chart { min-width:0; }
.badge { display:inline-block; white-space:nowrap; padding:1px 10px; border-radius:999px; font-size:12px; font-weight:600;
  text-transform:uppercase; letter-spacing:.03em; }
.status-converged, .gate-pass { background:var(--ok-bg); color:var(--ok); }
.status-failed, .gate-fail, .gate-missing, .sev-critical, .sev-error { background:var(--bad-bg); color:var(--bad); }
.status-budget_exhausted, .status-iterations_exhausted, .gate-error, .sev-warning { background:var(--warn-bg); color:var(--warn); }
.status-running, .sev-info { background:var(--run-bg); color:var(--run); }
.gate-not_measured { background:var(--idle-bg); color:var(--idle); }
.prov { text-transform:none; margin-right:6px; } .prov-simulated, .prov-replay { background:var(--warn-bg); color:var(--warn); }
.prov-real { background:var(--ok-bg); color:var(--ok); }
table { border-collapse:collapse; width:100%; margin:8px 0; }
td code, th code { white-space:nowrap; }
th, td { text-align:left; padding:6px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
th { font-weight:600; color:var(--muted); font-size:12px; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.text { max-width:520px; white-space:pre-wrap; word-break:break-word; }
tr.g-pass td { background:#f3fbf5; } tr.g-fail td, tr.g-missing td { background:#fef5f5; }
tr.g-error td { background:#fffaf0; } tr.g-not_measured td { color:var(--idle); }
table.matrix { width:auto; } table.matrix th { text-align:left; }
table.matrix td.cell { width:36px; text-align:center; font-weight:700; border:2px solid #fff; }
td.cell.g-pass { background:var(--ok-bg); color:var(--ok); } td.cell.g-fail, td.cell.g-missing { background:var(--bad-bg); color:var(--bad); }
td.cell.g-error { background:var(--warn-bg); color:var(--warn); } td.cell.g-not_measured { background:var(--idle-bg); color:var(--idle); }
details { margin:8px 0; } summary { cursor:pointer; font-weight:500; padding:4px 0; }
pre { background:#f8f9fa; border:1px solid var(--line); border-radius:6px; padding:10px; overflow:auto;
  max-height:360px; font-size:12px; }
.lanes { display:flex; flex-direction:column; gap:10px; margin-bottom:12px; }
.lane { display:grid; grid-template-columns:170px 1fr; border:1px solid var(--line); border-radius:6px; }
.lane-head { background:#f0f4f8; padding:10px 12px; border-right:1px solid var(--line); }
.lane-head b { display:block; font-size:16px; } .lane-head span { color:var(--muted); font-size:12px; }
.lane-body { display:flex; flex-wrap:wrap; gap:10px; padding:10px; }
.iter { border:1px solid var(--line); border-left:4px solid var(--ok); border-radius:6px; padding:6px 8px;
  background:#fff; }
.iter.st-border-failed { border-left-color:var(--bad); } .iter.st-border-running { border-left-color:var(--run); }
.iter.st-border-pending, .iter.st-border-skipped { border-left-color:var(--idle); }
.iter-head { display:flex; justify-content:space-between; gap:16px; font-size:12px; margin-bottom:4px; }
.iter-head span { color:var(--muted); }
.phases { display:flex; align-items:center; gap:2px; } .phases i { color:#9aa5b1; font-style:normal; font-size:11px; }
.phase { border-radius:4px; padding:2px 6px; font-size:11px; text-align:center; min-width:58px; }
.phase span { display:block; font-weight:600; } .phase small { color:inherit; opacity:.8; }
.chip { display:inline-block; border-radius:4px; padding:0 6px; font-size:11px; margin-left:4px; }
.st-done { background:var(--ok-bg); color:var(--ok); } .st-failed { background:var(--bad-bg); color:var(--bad); }
.st-running { background:var(--run-bg); color:var(--run); }
.st-pending { background:var(--idle-bg); color:var(--idle); border:1px dashed #ced4da; }
.st-skipped { background:#fafafa; color:#adb5bd; text-decoration:line-through; }
.finding { border:1px solid var(--line); border-left:4px solid var(--run); border-radius:6px; padding:10px 14px;
  margin:10px 0; }
.finding.f-critical, .finding.f-error { border-left-color:var(--bad); } .finding.f-warning { border-left-color:var(--warn); }
.f-head { display:flex; align-items:center; gap:12px; flex-wrap:wrap; }
.f-head span { color:var(--muted); }
.finding p { margin:8px 0; }
footer { color:var(--muted); font-size:12px; padding:8px 24px 32px; }
"""
