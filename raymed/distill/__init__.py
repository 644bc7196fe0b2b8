"""Distillation: a frozen teacher's next-token distributions taught to a smaller student.

    config   the `distill` section (DistillConfig; no I/O)
    student  the teacher resolved and pinned; the student taken from its layers, or the
             `model` section with the teacher's vocabulary checked
    loss     (1 − α)·CE + α·T²·KL(p_teacher ‖ p_student) over the labelled tokens
    loop     the fine-tuning worker loop with the teacher beside the student
    run      prepare, train, promote into the student's own registry model (`distill`)
    cli      `raymed distill`

Nothing is imported here: raymed.config imports `raymed.distill.config`, and the other
modules import raymed.config.
"""
