// profile.json writer and the timeline reader of `ktune trace` (profiler/profile_doc.h).
#include "profiler/profile_doc.h"

#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "ktune/engine/atomic_file.h"
#include "ktune/engine/error.h"
#include "profiler/profile_summary.h"

namespace ktune::profiler {

using nlohmann::json;

namespace {

json run_json(const RunInfo& r) {
  return {{"command", r.command},
          {"model", r.model},
          {"placement", r.placement},
          {"engine", r.engine},
          {"engine_description", r.engine_description},
          {"cuda_graph", r.cuda_graph},
          {"moe_kernel", r.moe_kernel},
          {"pcie_assist", r.pcie_assist},
          {"threads", r.threads},
          {"prefill_tokens", r.prompt},
          {"decode_tokens", r.gen},
          {"batch", r.batch},
          {"warmup_tokens", r.warmup},
          {"trace_mode", r.trace_mode},
          {"trace_level", r.trace_level}};
}

json overhead_json(const Overhead& o) {
  json levels = json::array();
  for (const Overhead::Level& l : o.levels) {
    levels.push_back({{"trace_level", l.trace_level},
                      {"traced_decode_tok_s", l.traced_tok_s},
                      {"traced_median_tok_s", l.traced_median},
                      {"overhead_fraction", l.overhead_fraction}});
  }
  json j = {{"mode", o.mode},
            {"trace_level", o.trace_level},
            {"not_recorded", o.not_recorded},
            {"untraced_decode_tok_s", o.untraced_tok_s},
            {"traced_decode_tok_s", o.traced_tok_s},
            {"untraced_median_tok_s", o.untraced_median},
            {"traced_median_tok_s", o.traced_median},
            {"overhead_fraction", o.overhead_fraction},
            {"levels", levels}};
  if (o.profile_run_tok_s > 0) {  // measured (not by --exec)
    j["profile_run_tok_s"] = o.profile_run_tok_s;
    j["profile_run_overhead_fraction"] = o.profile_run_overhead_fraction;
    j["untraced_padding_steps"] = o.untraced_padding_steps;
    if (o.padding_tok_s > 0) j["padding_tok_s"] = o.padding_tok_s;
    if (o.untraced_pooled_tok_s > 0) j["untraced_pooled_tok_s"] = o.untraced_pooled_tok_s;
    j["trace_padding"] = o.trace_padding;
  }
  return j;
}

std::string base_dir(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash + 1);
}

}  // namespace

void write_profile_json(const std::string& path, const ProfileDoc& doc, size_t inline_events) {
  json j;
  j["ktune_profile"] = profile::kProfileSchemaVersion;
  json summary;
  profile::to_json(summary, doc.summary);
  j["summary"] = std::move(summary);
  j["run"] = run_json(doc.run);
  j["notes"] = doc.notes;
  j["verdict"] = {{"headline", doc.verdict.headline}, {"reasons", doc.verdict.reasons}};
  j["topology"] = to_json(doc.topology);
  json windows = json::object();
  for (const WindowMetrics& w : doc.windows) windows[w.kind] = to_json(w);
  j["windows"] = windows;
  j["router"] = to_json(doc.router);
  j["overhead"] = overhead_json(doc.overhead);
  if (!doc.hardware.is_null()) j["hardware"] = doc.hardware;
  if (!doc.exec.is_null()) j["exec"] = doc.exec;
  TimelineLimits lim;
  lim.max_ops = inline_events;
  lim.max_spans = inline_events;
  lim.max_api = inline_events;
  j["timeline"] = timeline_to_json(doc.timeline, lim);
  j["timeline_file"] = doc.timeline_file;
  write_file_atomic(path, j.dump(1) + "\n");
}

void write_timeline_json(const std::string& path, const Timeline& t) {
  json j;
  j["ktune_timeline"] = 1;
  j["timeline"] = timeline_to_json(t);
  write_file_atomic(path, j.dump() + "\n");
}

Timeline read_profile_timeline(const std::string& profile_path, std::string* which) {
  const json doc = profile::read_profile_document(profile_path);
  if (doc.contains("timeline_file") && doc["timeline_file"].is_string() &&
      !doc["timeline_file"].get<std::string>().empty()) {
    const std::string name = doc["timeline_file"].get<std::string>();
    // ktune writes the bare name of a file beside the profile; a path from a profile of
    // unknown origin could point anywhere on this machine.
    if (name.find('/') != std::string::npos || name == "." || name == "..") {
      throw Error(profile_path + ": timeline_file", "`" + name + "` is not a file name",
                  "a profile names its timeline file beside it; re-record the profile with "
                  "`ktune profile`");
    }
    const std::string side = base_dir(profile_path) + name;
    std::ifstream ts(side, std::ios::binary);
    if (ts) {
      json tj;
      const std::string text((std::istreambuf_iterator<char>(ts)), std::istreambuf_iterator<char>());
      profile::check_json_depth(text, side, profile::kMaxJsonDepth);
      try {
        tj = json::parse(text, nullptr, true, false);
      } catch (const json::exception& e) {
        throw Error(side, std::string("not valid JSON (") + e.what() + ")",
                    "re-record the profile with `ktune profile`, or delete this file to use "
                    "the compact timeline inside " +
                        profile_path);
      }
      if (!tj.is_object() || !tj.contains("timeline")) {
        throw Error(side, "not a ktune timeline (no \"timeline\" key)",
                    "re-record the profile with `ktune profile`");
      }
      if (which) *which = side;
      return timeline_from_json(tj["timeline"], side);
    }
  }
  if (!doc.contains("timeline")) {
    throw Error(profile_path + ": timeline", "missing (and no timeline file beside it)",
                "re-record the profile with `ktune profile`");
  }
  if (which) *which = profile_path + " (compact timeline)";
  return timeline_from_json(doc["timeline"], profile_path);
}

}  // namespace ktune::profiler
