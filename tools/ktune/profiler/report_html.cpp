// The self-contained HTML report (profiler/report.h): no network, no external files. Tables and
// bars are SVG generated here; the timeline is drawn on a canvas by a small inline script from
// the events of the first part of the decode window, embedded as JSON.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "ktune/engine/build_info.h"
#include "profiler/report.h"

namespace ktune::profiler {
namespace {

std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      default: o += c;
    }
  }
  return o;
}

const char* kColors[] = {"#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                         "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"};

std::string budget_svg(const WindowMetrics& w) {
  const int width = 760, bar_h = 28;
  std::string s = fmt::format(
      R"J(<svg class="bar" width="{}" height="{}" role="img" aria-label="{} budget">)J", width,
      bar_h + 18 * static_cast<int>((w.budget.size() + 3) / 4) + 10, esc(w.kind));
  double x = 0;
  for (size_t i = 0; i < w.budget.size(); ++i) {
    const double bw = w.budget[i].fraction * width;
    s += fmt::format(R"J(<rect x="{:.1f}" y="0" width="{:.1f}" height="{}" fill="{}"><title>{}: {:.1f} µs/token ({:.1f} %)</title></rect>)J",
                     x, bw, bar_h, kColors[i % 10], esc(w.budget[i].name),
                     w.budget[i].us_per_token, 100 * w.budget[i].fraction);
    x += bw;
  }
  for (size_t i = 0; i < w.budget.size(); ++i) {
    const int col = static_cast<int>(i % 4), row = static_cast<int>(i / 4);
    s += fmt::format(R"J(<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{} {:.1f} %</text>)J",
                     col * 190, bar_h + 8 + row * 18, kColors[i % 10], col * 190 + 14,
                     bar_h + 17 + row * 18, esc(w.budget[i].name), 100 * w.budget[i].fraction);
  }
  return s + "</svg>";
}

std::string idle_svg(const WindowMetrics& w) {
  std::string s;
  for (const GpuMetrics& g : w.gpus) {
    if (g.kernels == 0 && w.gpus.size() < 2) continue;
    const int width = 760;
    const double busy = (1 - g.idle_fraction) * width;
    s += fmt::format(
        R"J(<div>cuda:{} busy {:.1f} %, idle {:.1f} %</div><svg class="bar" width="{}" height="20"><rect x="0" y="0" width="{:.1f}" height="20" fill="#59a14f"><title>busy</title></rect><rect x="{:.1f}" y="0" width="{:.1f}" height="20" fill="#e15759"><title>idle</title></rect></svg>)J",
        g.device, 100 * (1 - g.idle_fraction), 100 * g.idle_fraction, width, busy, busy,
        width - busy);
  }
  return s;
}

// Events of the first `span_us` of the decode window, for the canvas timeline.
nlohmann::json timeline_slice(const ProfileDoc& d, double span_us) {
  nlohmann::json rows = nlohmann::json::array();
  const Timeline& t = d.timeline;
  const Window* win = nullptr;
  for (const Window& w : t.windows) {
    if (w.kind == "decode") win = &w;
  }
  if (win == nullptr) return rows;
  const int64_t w0 = win->start;
  const int64_t w1 = std::min<int64_t>(win->end, w0 + static_cast<int64_t>(span_us * 1000));
  const auto tags = attribute_ops(t);
  size_t n = 0;
  for (size_t i = 0; i < t.ops.size() && n < 20000; ++i) {
    const GpuOp& o = t.ops[i];
    if (o.end < w0 || o.start > w1) continue;
    rows.push_back({fmt::format("cuda:{} stream {}", o.device, o.stream),
                    static_cast<double>(o.start - w0) / 1e3,
                    static_cast<double>(o.end - o.start) / 1e3, t.str(o.name),
                    phase_name(tags[i].phase), tags[i].layer});
    ++n;
  }
  for (const HostSpan& s : t.spans) {
    if (n >= 40000) break;
    if (s.end < w0 || s.start > w1 || trace::is_step_phase(s.phase)) continue;
    const std::string th = s.thread < t.threads.size() ? t.threads[s.thread].name : "thread";
    rows.push_back({th, static_cast<double>(s.start - w0) / 1e3,
                    static_cast<double>(s.end - s.start) / 1e3, phase_name(s.phase),
                    phase_name(s.phase), s.arg});
    ++n;
  }
  return rows;
}

}  // namespace

std::string html_report(const ProfileDoc& d) {
  std::string h;
  h += "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">";
  h += "<title>ktune profile report</title><style>";
  h += "body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}"
       "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;"
       "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
       ".verdict{font-size:1.2em;background:#fff4d6;padding:10px;border-left:4px solid #f28e2b}"
       "svg text{font-size:12px}canvas{border:1px solid #ccc}.note{color:#666}";
  h += "</style></head><body>\n";
  h += fmt::format("<h1>ktune profile</h1><p class=\"note\">ktune {} ({})</p>\n", build_version(),
                   build_commit());
  h += "<p class=\"verdict\" id=\"verdict\">" + esc(d.verdict.headline) + "</p><ul>";
  for (const std::string& r : d.verdict.reasons) h += "<li>" + esc(r) + "</li>";
  h += "</ul>\n<h2>Run</h2><table>";
  auto row = [&](const std::string& k, const std::string& v) {
    h += "<tr><th>" + esc(k) + "</th><td>" + esc(v) + "</td></tr>";
  };
  row("model", d.run.model);
  row("placement", d.run.placement);
  row("engine", d.run.engine + " (" + d.run.engine_description + ")");
  row("tracing", d.run.trace_mode);
  if (d.overhead.untraced_median > 0) {
    for (const Overhead::Level& l : d.overhead.levels) {  // one per traced level
      row("overhead (" + l.trace_level + ")",
          fmt::format("{:.2f} tok/s untraced, {:.2f} tok/s on the traced steps ({:+.1f} %)",
                      d.overhead.untraced_median, l.traced_median, -100 * l.overhead_fraction));
    }
    if (d.overhead.profile_run_tok_s > 0) {
      row("overhead (profiling run)",
          fmt::format("{:.2f} tok/s ({:+.1f} %): {} traced + {} untraced steps (--trace-padding "
                      "{})",
                      d.overhead.profile_run_tok_s, -100 * d.overhead.profile_run_overhead_fraction,
                      d.run.gen, d.overhead.untraced_padding_steps,
                      d.overhead.trace_padding.empty() ? "auto" : d.overhead.trace_padding));
    }
  }
  for (const std::string& n : d.notes) row("note", n);
  h += "</table>\n";
  for (const WindowMetrics& w : d.windows) {
    h += fmt::format("<h2>{} ({} tokens, {:.2f} tok/s)</h2>\n", esc(w.kind), w.tokens, w.tok_s);
    h += "<h3>Where each token's time went</h3>" + budget_svg(w);
    h += idle_svg(w);
    h += "<table><tr><th>device</th><th>idle %</th><th>gaps</th><th>median gap µs</th>"
         "<th>p90 gap µs</th><th>kernels/token</th><th>launches/token</th>"
         "<th>pipeline stage</th><th>waits upstream µs/token</th>"
         "<th>waits downstream µs/token</th><th>inter-GPU transfers µs/token</th></tr>";
    const double tok = std::max<double>(1, static_cast<double>(w.tokens));
    for (const GpuMetrics& g : w.gpus) {
      // One GPU: only GPUs that ran kernels; several: every GPU (an unused one is news too).
      if (g.kernels == 0 && w.gpus.size() < 2) continue;
      h += fmt::format(
          "<tr><td>cuda:{}</td><td>{:.1f}</td><td>{}</td><td>{:.2f}</td><td>{:.2f}</td>"
          "<td>{:.1f}</td><td>{:.1f}</td><td>{}</td><td>{:.1f}</td><td>{:.1f}</td>"
          "<td>{:.1f}</td></tr>",
          g.device, 100 * g.idle_fraction, g.gaps.count, g.gaps.median_us, g.gaps.p90_us,
          g.kernels_per_token, g.launches_per_token,
          g.pipeline_stage >= 0 ? std::to_string(g.pipeline_stage) : std::string("-"),
          g.bubble_us / tok, g.downstream_wait_us / tok, g.peer_transfer_us / tok);
    }
    h += "</table>";
    if (!w.expert_bandwidth.empty()) {
      h += "<table><tr><th>expert bandwidth</th><th>GB/s</th><th>MB read</th><th>phase ms</th></tr>";
      for (const ExpertBandwidth& e : w.expert_bandwidth) {
        h += fmt::format("<tr><td>{}</td><td>{:.1f}</td><td>{:.1f}</td><td>{:.2f}</td></tr>",
                         esc(e.device), e.gb_s, e.bytes / 1e6, e.phase_wall_us / 1e3);
      }
      h += "</table>";
    }
  }
  const nlohmann::json slice = timeline_slice(d, 30000);
  h += "<h2>Timeline (start of the decode window)</h2>";
  h += "<p class=\"note\">One row per GPU stream and CPU thread; colour = phase. Hover for "
       "names. Scroll the page; the first 30 ms are drawn.</p>";
  h += "<canvas id=\"tl\" width=\"1060\" height=\"60\"></canvas><div id=\"tip\" "
       "class=\"note\">&nbsp;</div>\n";
  std::string data = slice.dump();
  // Keep "</script>" out of the embedded JSON.
  for (size_t p = data.find("</"); p != std::string::npos; p = data.find("</", p + 2)) {
    data.replace(p, 2, "<\\/");
  }
  h += "<script>const EV=" + data + ";\n";
  h += R"JS(
const PH={attention:'#4e79a7',router:'#f28e2b',moe_gpu:'#e15759',moe_cpu:'#76b7b2',
transfer:'#59a14f',sampling:'#edc948',other:'#bab0ac'};
const c=document.getElementById('tl'),g=c.getContext('2d');
const rows=[...new Set(EV.map(e=>e[0]))];const rh=16,lw=150;
c.height=Math.max(40,rows.length*rh+20);
let end=1;for(const e of EV)end=Math.max(end,e[1]+e[2]);
const sx=(c.width-lw-10)/end;
g.font='11px sans-serif';
rows.forEach((r,i)=>{g.fillStyle='#333';g.fillText(r.slice(0,24),2,i*rh+12);});
for(const e of EV){const y=rows.indexOf(e[0])*rh+2;g.fillStyle=PH[e[4]]||'#999';
g.fillRect(lw+e[1]*sx,y,Math.max(1,e[2]*sx),rh-4);}
g.fillStyle='#333';g.fillText('0',lw,c.height-4);g.fillText(end.toFixed(0)+' us',c.width-70,c.height-4);
c.addEventListener('mousemove',ev=>{const r=c.getBoundingClientRect();const x=(ev.clientX-r.left-lw)/sx;
const row=Math.floor((ev.clientY-r.top-2)/rh);let hit=null;
for(const e of EV){if(rows.indexOf(e[0])===row&&x>=e[1]&&x<=e[1]+e[2]){hit=e;break;}}
document.getElementById('tip').textContent=hit?`${hit[0]}: ${hit[3]} (${hit[4]}, layer ${hit[5]}) at ${hit[1].toFixed(1)} us for ${hit[2].toFixed(1)} us`:'\u00a0';});
)JS";
  h += "</script>\n</body></html>\n";
  return h;
}

}  // namespace ktune::profiler
