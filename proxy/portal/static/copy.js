// The copy buttons of the Integration API page; the page works without it.
(function () {
  var script = document.currentScript;
  var copied = script ? script.getAttribute("data-copied") : "Copied";
  document.querySelectorAll("button.copy").forEach(function (button) {
    button.addEventListener("click", function () {
      var field = document.getElementById(button.getAttribute("data-copy"));
      if (!field) { return; }
      field.select();
      var done = function () { button.textContent = copied; };
      if (navigator.clipboard) {
        navigator.clipboard.writeText(field.value).then(done, function () { document.execCommand("copy"); done(); });
      } else {
        document.execCommand("copy"); done();
      }
    });
  });
})();
