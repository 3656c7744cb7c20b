// Shows recording times and dates in the reader's own locale and time zone, each time
// with its zone's name, and takes a time typed to replay the record in that zone too.
// Without JavaScript the page shows and takes them as recorded (UTC), which is just as
// true.
(function () {
  "use strict";
  var moment = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "numeric", minute: "2-digit",
    timeZoneName: "short" });
  var day = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeZone: "UTC" });
  var zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  function replayInLocalTime(form) {
    var typed = form.querySelector("input[type=datetime-local]");
    if (!typed || !zone) { return; }
    var label = form.querySelector("label[for='" + typed.id + "']");
    var name = typed.name;
    var sent = document.createElement("input");
    sent.type = "hidden";
    if (label) { label.textContent = "Replay as recorded at (your time, " + zone + ")"; }
    form.addEventListener("submit", function () {
      var when = new Date(typed.value);  // a datetime-local value reads as local time
      if (!typed.value || isNaN(when)) {  // sent as typed: the server says what is wrong
        typed.name = name;
        sent.remove();
        return;
      }
      sent.name = name;
      sent.value = when.toISOString();
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
