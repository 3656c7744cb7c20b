// Shows recording times and dates in the reader's own locale and time zone, each time
// with its zone's name, and takes a time typed to replay the record in that zone too.
// Without JavaScript the page shows and takes them as recorded (UTC), which is just as
// true.
(function () {
  "use strict";
  // To the second: a time read off the timeline and typed to replay finds its event.
  var moment = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "numeric", minute: "2-digit",
    second: "2-digit", timeZoneName: "short" });
  var day = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeZone: "UTC" });
  var zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  function local(when) {  // as a datetime-local input writes it, in the reader's zone
    function two(n) { return String(n).padStart(2, "0"); }
    return when.getFullYear() + "-" + two(when.getMonth() + 1) + "-" + two(when.getDate()) +
      "T" + two(when.getHours()) + ":" + two(when.getMinutes()) + ":" + two(when.getSeconds());
  }
  function replayInLocalTime(form) {
    var typed = form.querySelector("input[type=datetime-local]");
    if (!typed || !zone) { return; }
    var label = form.querySelector("label[for='" + typed.id + "']");
    var name = typed.name;
    var sent = document.createElement("input");
    sent.type = "hidden";
    if (label) { label.textContent = label.textContent.replace("(UTC)", "(your time, " + zone + ")"); }
    var shown = new Date(typed.getAttribute("data-utc") || "");  // the moment asked before
    if (!isNaN(shown)) { typed.value = local(shown); }
    form.addEventListener("submit", function () {
      var when = new Date(typed.value);  // a datetime-local value reads as local time
      if (!typed.value || isNaN(when)) {  // sent as typed (empty: the record now)
        typed.name = name;
        sent.remove();
        return;
      }
      sent.name = name;
      // In UTC, to the second: the server shows the record as it stood at the end of
      // that second.
      sent.value = when.toISOString().slice(0, 19) + "Z";
      typed.removeAttribute("name");
      form.appendChild(sent);
    });
  }
  function localize() {
    document.querySelectorAll("time[data-moment]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (!isNaN(when)) { el.title = el.textContent; el.textContent = moment.format(when); }
    });
    document.querySelectorAll("time[data-day]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime") + "T00:00:00Z");
      if (!isNaN(when)) { el.title = el.getAttribute("datetime"); el.textContent = day.format(when); }
    });
    document.querySelectorAll("form[data-replay]").forEach(replayInLocalTime);
    // A refused form's message takes the focus, so the keyboard is where the fields are.
    var refusal = document.querySelector(".error[role=alert]");
    if (refusal) {
      refusal.setAttribute("tabindex", "-1");
      refusal.focus();
    }
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", localize);
  } else {
    localize();
  }
}());
