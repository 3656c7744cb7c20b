// Shows recording times and dates in the reader's own locale and time zone. Without
// JavaScript the page shows them as recorded (UTC), which is just as true.
(function () {
  "use strict";
  var moment = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
  var day = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeZone: "UTC" });
  function localize() {
    document.querySelectorAll("time[data-moment]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (!isNaN(when)) { el.title = el.textContent; el.textContent = moment.format(when); }
    });
    document.querySelectorAll("time[data-day]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime") + "T00:00:00Z");
      if (!isNaN(when)) { el.title = el.getAttribute("datetime"); el.textContent = day.format(when); }
    });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", localize);
  } else {
    localize();
  }
}());
