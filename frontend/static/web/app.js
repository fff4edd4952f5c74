// Skyport's few page behaviours beyond htmx; every page works without them.
// - the header's menu button on narrow screens (without JavaScript the menu is simply open)
// - copy buttons: [data-copy] copies the text of the element it names
(function () {
  "use strict";
  document.documentElement.classList.add("js");

  function setup(root) {
    root.querySelectorAll("[data-menu-toggle]").forEach(function (button) {
      if (button.dataset.ready) return;
      button.dataset.ready = "1";
      button.hidden = false;
      const header = button.closest("header");
      button.addEventListener("click", function () {
        const open = button.getAttribute("aria-expanded") !== "true";
        button.setAttribute("aria-expanded", String(open));
        header.classList.toggle("menu-open", open);
      });
    });
    root.querySelectorAll("[data-copy]").forEach(function (button) {
      if (button.dataset.ready) return;
      button.dataset.ready = "1";
      button.hidden = false;
      button.addEventListener("click", async function () {
        const source = document.getElementById(button.dataset.copy);
        const value = source ? (source.value !== undefined ? source.value : source.textContent).trim() : "";
        const label = button.textContent;
        try {
          await navigator.clipboard.writeText(value);
          button.textContent = "Copied";
        } catch (err) {
          if (source && source.select) source.select();
          button.textContent = "Press Ctrl+C";
        }
        setTimeout(function () { button.textContent = label; }, 2000);
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () { setup(document); });
  document.addEventListener("htmx:afterSettle", function (event) { setup(event.target); });
})();
