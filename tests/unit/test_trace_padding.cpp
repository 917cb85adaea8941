// `ktune profile --trace-padding`: untraced decode steps after the traced window so that the
// profiling run as a whole keeps the untraced speed. The choice of the padding (a pure function
// with known answers), its notes, profile.json's run figures, the reports, the CLI, and a CPU
// profile end to end (host spans only: no CUPTI here).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <numeric>

#include "profiler/profile_doc.h"
#include "profiler/profile_run.h"
#include "profiler/profile_summary.h"
#include "profiler/report.h"
#include "profiler/trace_padding.h"
#include "subprocess.h"

namespace {

using namespace ktune;
using profiler::amortised_overhead;
using profiler::choose_untraced_padding;
using profiler::PaddingChoice;

// ---- the pure function ----

TEST(TracePadding, AmortisedOverheadIsTheRunsSlowdown) {
  // W traced steps at 0.7 of the untraced speed and P untraced steps: W/0.7 + P step-times for
  // W + P steps. 64 traced alone: 30 %; with 1006 untraced: 19.2 / (64 + 704.2).
  EXPECT_NEAR(amortised_overhead(0.3, 64, 0), 0.3, 1e-12);
  EXPECT_NEAR(amortised_overhead(0.3, 64, 1006), 0.3 * 64 / (64 + 1006 * 0.7), 1e-12);
  const double direct = 1.0 - (64.0 + 1006.0) / (64.0 / 0.7 + 1006.0);
  EXPECT_NEAR(amortised_overhead(0.3, 64, 1006), direct, 1e-12);
  EXPECT_DOUBLE_EQ(amortised_overhead(-0.01, 64, 100), -0.01);  // noise stays what it was
  EXPECT_DOUBLE_EQ(amortised_overhead(0.3, 0, 100), 0);
  EXPECT_DOUBLE_EQ(amortised_overhead(NAN, 64, 100), 0);
}

TEST(TracePadding, NoPaddingWhenTheTracedStepsAreWithinTheTarget) {
  for (double d : {-0.05, 0.0, 0.01, 0.025}) {
    const PaddingChoice c = choose_untraced_padding(d, 64, 50, 0.025, 20);
    EXPECT_EQ(c.steps, 0) << d;
    EXPECT_FALSE(c.capped) << d;
    EXPECT_DOUBLE_EQ(c.run_overhead, d) << d;
  }
  EXPECT_EQ(choose_untraced_padding(NAN, 64, 50, 0.025, 20).steps, 0);
  EXPECT_EQ(choose_untraced_padding(0.3, 64, 50, 0.0, 20).steps, 0);  // no target: nothing
}

TEST(TracePadding, KnownAnswers) {
  // d 0.3, W 64, target 2.5 %: W·(12 − 1)/0.7 = 1005.7 -> 1006 steps (1005 is not enough).
  PaddingChoice c = choose_untraced_padding(0.3, 64, 1000, 0.025, 20);
  EXPECT_EQ(c.steps, 1006);
  EXPECT_EQ(c.steps_for_target, 1006);
  EXPECT_FALSE(c.capped);
  EXPECT_LE(c.run_overhead, 0.025);
  EXPECT_GT(amortised_overhead(0.3, 64, 1005), 0.025);
  // An exact quotient is not rounded up: d 0.5, target 0.25, W 10 -> 10·1/0.5 = 20.
  c = choose_untraced_padding(0.5, 10, 1000, 0.25, 20);
  EXPECT_EQ(c.steps, 20);
  EXPECT_DOUBLE_EQ(c.run_overhead, 0.25);
  // d 0.05, W 64: 64/0.95 = 67.4 -> 68.
  EXPECT_EQ(choose_untraced_padding(0.05, 64, 1000, 0.025, 20).steps, 68);
}

TEST(TracePadding, CappedAtSixteenWindowsOrTwentySeconds) {
  // d 0.31 needs 64·11.4/0.69 = 1057.4 -> 1058 > 16 × 64: capped at 1024, 2.57 % expected.
  PaddingChoice c = choose_untraced_padding(0.31, 64, 1000, 0.025, 20, 16);
  EXPECT_EQ(c.steps_for_target, 1058);
  EXPECT_EQ(c.steps, 1024);
  EXPECT_TRUE(c.capped);
  EXPECT_NEAR(c.run_overhead, 0.31 * 64 / (64 + 1024 * 0.69), 1e-12);
  // 20 steps/s for 20 s: 400 steps, the run stays 5.6 % slower.
  c = choose_untraced_padding(0.3, 64, 20, 0.025, 20, 16);
  EXPECT_EQ(c.steps, 400);
  EXPECT_TRUE(c.capped);
  EXPECT_NEAR(c.run_overhead, 19.2 / (64 + 280), 1e-12);
  // Speed unknown (0): the step cap alone.
  EXPECT_EQ(choose_untraced_padding(0.3, 64, 0, 0.025, 20, 16).steps, 1006);
  EXPECT_EQ(choose_untraced_padding(0.3, 64, 0, 0.025, 20, 4).steps, 256);
}

TEST(TracePadding, NotesSayWhatTheCapLeftAndThatGapsIncludeTheDilation) {
  const PaddingChoice capped =
      choose_untraced_padding(0.3, 64, 20, profiler::kPaddingTargetFraction, 20);
  auto notes = profiler::tracing_overhead_notes(0.3, capped, true, true, 2200);
  ASSERT_EQ(notes.size(), 2u);
  EXPECT_NE(notes[0].find("could not meet its 2.0 % target"), std::string::npos) << notes[0];
  EXPECT_NE(notes[0].find("its 400 steps leave the profiling run 5.6 % slower"), std::string::npos)
      << notes[0];
  EXPECT_NE(notes[1].find("30.0 % slower than untraced (CUPTI's cost per launch, 2200 launches "
                          "per token): the GPU gaps and idle time"),
            std::string::npos)
      << notes[1];
  // An explicit padding is what was asked: no cap note; a small dilation: no note at all.
  notes = profiler::tracing_overhead_notes(0.3, capped, false, true, 2200);
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_EQ(notes[0].find("--trace-padding"), std::string::npos);
  EXPECT_TRUE(profiler::tracing_overhead_notes(0.05, {}, true, true, 100).empty());
}

// ---- profile.json and the reports ----

profiler::ProfileDoc doc_with_run() {
  profiler::ProfileDoc d;
  d.run.engine = "gpu";
  d.run.gen = 64;
  d.run.trace_level = "light";
  auto& o = d.overhead;
  o.untraced_tok_s = {100, 100, 100};
  o.untraced_median = 100;
  o.trace_level = "light";
  o.levels = {{"light", {70}, 70, 0.3}};
  o.traced_tok_s = {70};
  o.traced_median = 70;
  o.overhead_fraction = 0.3;
  o.profile_run_tok_s = 97.6;
  o.profile_run_overhead_fraction = 0.024;
  o.untraced_padding_steps = 1006;
  o.trace_padding = "auto";
  return d;
}

TEST(TracePaddingReport, TerminalAndHtmlReportsPrintBothOverheads) {
  const profiler::ProfileDoc d = doc_with_run();
  const std::string rep = profiler::terminal_report(d);
  EXPECT_NE(rep.find("# tracing overhead (level light): 30.0 % on the traced steps"),
            std::string::npos)
      << rep;
  EXPECT_NE(rep.find("# tracing overhead (profiling run): 2.4 % (64 traced + 1006 untraced "
                     "steps, --trace-padding auto: 97.60 tok/s vs 100.00 tok/s untraced)"),
            std::string::npos)
      << rep;
  const std::string html = profiler::html_report(d);
  EXPECT_NE(html.find("overhead (profiling run)"), std::string::npos);
  EXPECT_NE(html.find("97.60 tok/s (-2.4 %): 64 traced + 1006 untraced steps"), std::string::npos)
      << html;
  // Not measured (profile --exec): no line.
  profiler::ProfileDoc e = d;
  e.overhead.profile_run_tok_s = 0;
  EXPECT_EQ(profiler::terminal_report(e).find("profiling run"), std::string::npos);
}

TEST(TracePaddingReport, ProfileJsonHasTheRunFiguresWhenMeasured) {
  char tmpl[] = "/tmp/ktune_trace_padding_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  const std::string p = dir + "/p.json";
  profiler::write_profile_json(p, doc_with_run());
  auto j = profile::read_profile_document(p);
  EXPECT_EQ(j["ktune_profile"], profile::kProfileSchemaVersion);  // added keys: no bump
  const auto& o = j["overhead"];
  EXPECT_DOUBLE_EQ(o["profile_run_tok_s"].get<double>(), 97.6);
  EXPECT_DOUBLE_EQ(o["profile_run_overhead_fraction"].get<double>(), 0.024);
  EXPECT_EQ(o["untraced_padding_steps"], 1006);
  EXPECT_EQ(o["trace_padding"], "auto");
  EXPECT_DOUBLE_EQ(o["overhead_fraction"].get<double>(), 0.3);  // the traced steps', as before
  profiler::ProfileDoc e = doc_with_run();
  e.overhead.profile_run_tok_s = 0;  // --exec measures no overhead
  profiler::write_profile_json(p, e);
  j = profile::read_profile_document(p);
  EXPECT_FALSE(j["overhead"].contains("profile_run_tok_s"));
  EXPECT_FALSE(j["overhead"].contains("untraced_padding_steps"));
  (void)!std::system(("rm -rf " + test::shell_quote(dir)).c_str());
}

// ---- a CPU profile end to end ----

profiler::ProfileOptions tiny_profile(const std::string& out, int64_t padding) {
  profiler::ProfileOptions o;
  o.run.model = "synth:tiny";
  o.run.model_given = true;
  o.run.threads = {1};
  o.run.prompt = 0;
  o.run.gen = 4;
  o.warmup = 1;
  o.untraced_windows = 1;
  o.quick = true;
  o.quiet = true;
  o.trace_padding = padding;
  o.out = out;
  return o;
}

TEST(TracePaddingProfile, CpuProfileRunsTheAskedPaddingUntracedAfterTheWindow) {
  char tmpl[] = "/tmp/ktune_trace_padding_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  const auto o = tiny_profile(dir + "/p.json", 5);
  const profiler::ProfileDoc d = profiler::run_profile(o);
  const auto& oh = d.overhead;
  EXPECT_EQ(oh.untraced_padding_steps, 5);
  EXPECT_EQ(oh.trace_padding, "5");
  EXPECT_GT(oh.profile_run_tok_s, 0);
  // With padding the run's baseline is every untraced step pooled: the window (4 tokens) and the
  // 5 padding steps over their summed wall, a speed between the two.
  ASSERT_GT(oh.untraced_pooled_tok_s, 0);
  EXPECT_NEAR(oh.profile_run_overhead_fraction, 1 - oh.profile_run_tok_s / oh.untraced_pooled_tok_s,
              1e-12);
  const double pooled_wall = 4 / oh.untraced_median + 5 / oh.padding_tok_s;
  EXPECT_NEAR(oh.untraced_pooled_tok_s, 9 / pooled_wall, 1e-6 * oh.untraced_pooled_tok_s);
  // The padding's own speed: untraced, between the traced window's and the run's extremes; a
  // note names it when it strays from the baseline windows by more than 5 %.
  EXPECT_GT(oh.padding_tok_s, 0);
  const bool drifted = std::abs(oh.padding_tok_s / oh.untraced_median - 1) > 0.05;
  bool noted = false;
  for (const auto& n : d.notes) noted = noted || n.find("untraced steps ran at") != std::string::npos;
  EXPECT_EQ(noted, drifted);
  // The analysis is of the n traced steps alone: the decode window, its routing counts (each of
  // the 4 tokens selects k experts per layer) and its host spans (none after the window: the
  // padding is untraced).
  ASSERT_FALSE(d.windows.empty());
  const auto& w = d.windows.back();
  EXPECT_EQ(w.kind, "decode");
  EXPECT_EQ(w.tokens, 4);
  ASSERT_FALSE(d.summary.router.counts.empty());
  for (const auto& layer : d.summary.router.counts) {
    EXPECT_EQ(std::accumulate(layer.begin(), layer.end(), int64_t{0}),
              4 * d.summary.model.n_experts_used);
  }
  const profiler::Window* dw = nullptr;
  for (const auto& x : d.timeline.windows) {
    if (x.kind == "decode") dw = &x;
  }
  ASSERT_NE(dw, nullptr);
  ASSERT_FALSE(d.timeline.spans.empty());
  for (const auto& s : d.timeline.spans) EXPECT_LE(s.start, dw->end);
  // profile.json and the report carry the run's figures.
  const auto j = profile::read_profile_document(o.out);
  EXPECT_EQ(j["overhead"]["untraced_padding_steps"], 5);
  EXPECT_EQ(j["overhead"]["trace_padding"], "5");
  EXPECT_GT(j["overhead"]["profile_run_tok_s"].get<double>(), 0);
  EXPECT_GT(j["overhead"]["padding_tok_s"].get<double>(), 0);
  EXPECT_NE(profiler::terminal_report(d).find("(4 traced + 5 untraced steps, --trace-padding 5"),
            std::string::npos);
  (void)!std::system(("rm -rf " + test::shell_quote(dir)).c_str());
}

TEST(TracePaddingProfile, OffIsTheTracedWindowAloneAndAutoFollowsTheChoice) {
  char tmpl[] = "/tmp/ktune_trace_padding_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  profiler::ProfileDoc d = profiler::run_profile(tiny_profile(dir + "/off.json", 0));
  EXPECT_EQ(d.overhead.untraced_padding_steps, 0);
  EXPECT_EQ(d.overhead.trace_padding, "off");
  EXPECT_DOUBLE_EQ(d.overhead.profile_run_tok_s, d.overhead.traced_median);
  EXPECT_EQ(d.overhead.padding_tok_s, 0);
  // auto: the steps the pure function gives for the dilation measured (host spans: usually 0).
  d = profiler::run_profile(tiny_profile(dir + "/auto.json", -1));
  const auto& oh = d.overhead;
  EXPECT_EQ(oh.trace_padding, "auto");
  const PaddingChoice c = choose_untraced_padding(
      oh.overhead_fraction, 4, oh.untraced_median, profiler::kPaddingTargetFraction,
      profiler::kPaddingMaxExtraSeconds, profiler::kPaddingMaxWindowFactor);
  EXPECT_EQ(oh.untraced_padding_steps, c.steps) << "dilation " << oh.overhead_fraction;
  (void)!std::system(("rm -rf " + test::shell_quote(dir)).c_str());
}

// ---- the CLI ----

TEST(TracePaddingCli, BadValuesAndMisplacedUsesAreOneLineUsageErrors) {
  test::expect_usage_errors({
      {{"profile", "--model", "synth:tiny", "--trace-padding", "some"},
       "ktune: error: --trace-padding some: is not auto, off or a step count 0..1000000; "},
      {{"profile", "--model", "synth:tiny", "--trace-padding", "-3"},
       "ktune: error: --trace-padding -3: is not auto, off or a step count"},
      {{"profile", "--model", "synth:tiny", "--trace-padding", "12x"},
       "ktune: error: --trace-padding 12x: is not auto, off or a step count"},
      {{"profile", "--exec", "--trace-padding", "off", "--", "/bin/true"},
       "ktune: error: --trace-padding: applies to the engine's profile only; "},
      {{"profile", "--hardware", "--trace-padding", "8"}, "ktune: error: --trace-padding: "},
  });
}

TEST(TracePaddingCli, HelpTeachesThePadding) {
  const auto r = test::run_ktune({"profile", "--help"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("--trace-padding"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("auto|off|N"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("every metric still comes from the n"), std::string::npos) << r.out;
}

}  // namespace
