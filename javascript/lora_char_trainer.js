// Character LoRA Trainer: the WebUI's own progress bar for training jobs, and Lora card refreshes.
// The tab's buttons call these through small inline wrappers, so the tab also works without them.

(function() {
    var attached = {};

    // Show A1111's progress bar (step, ETA, loss from /internal/progress) for a job's task id.
    window.lctAttachProgress = function(taskId) {
        if (!taskId || attached[taskId] || typeof requestProgress !== 'function') {
            return;
        }
        var container = gradioApp().getElementById('lct_progressbar');
        if (!container) {
            return;
        }
        attached[taskId] = true;
        requestProgress(taskId, container, null, function() {
            delete attached[taskId];
        }, null, 120);
    };

    // The Train button: a fresh task id (the server runs the job under it) and its progress bar.
    window.lctStartTraining = function() {
        var args = Array.from(arguments);
        if (typeof randomId === 'function') {
            args[0] = randomId();
            window.lctAttachProgress(args[0]);
        }
        return args;
    };

    // New epochs are already known to the Lora extension on the server; rebuild the cards shown
    // in txt2img and img2img the way their own refresh button does.
    window.lctRefreshLoraCards = function() {
        ['txt2img', 'img2img'].forEach(function(tab) {
            var button = gradioApp().getElementById(tab + '_lora_extra_refresh_internal');
            if (button) {
                button.dispatchEvent(new Event('click'));
            }
        });
    };
})();
